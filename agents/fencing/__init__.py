"""Fencing: keep clusters safe by powering off (or cutting off) dead nodes through real fence devices.

``fence_api`` owns the Fence Agent API's rules (stdin ``key=value`` lines, options, actions, exit codes,
metadata XML) for both directions; ``driver`` runs one fence agent program under its own deadline;
``devices`` is the device registry built from the mesh file's ``fencing:`` section; ``power`` performs
verified power operations over levels of devices, coalescing concurrent requests per node; and
``fence_vertebra`` is the fence agent program by which Pacemaker reaches the mesh.
"""
