"""The shared kernel: paths, the one user-error base class, file helpers, seeds, typed configs.

Nothing here imports any other module of this project, so every layer may import it (DESIGN.md
"Layers"). Each module is small enough to read at a glance.
"""
