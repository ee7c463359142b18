"""Authorization policy: pure logic that imports nothing of the mesh.

Until the RBAC issue lands, the mesh's authorization hook (``agents.authz``) admits only the admins
listed in the mesh file; this package will hold the casbin policy model, loading, linting and
decisions that replace it."""
