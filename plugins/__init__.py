"""porter's built-in architecture plugins, one small file per family.

They load through the ``porter`` entry-point group like third-party plugins do.
"""
