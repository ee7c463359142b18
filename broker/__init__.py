"""The broker: the mesh's directory (who offers which op on which resources), and later policy
distribution, workflows, audit and operator chat. It is an actor like any agent."""
