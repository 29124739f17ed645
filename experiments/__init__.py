"""Experiments behind the design choices, kept out of the installed package: they read the
repository's data/ and write notebooks/figures/. Run from the repository root as
`python -m experiments.<name>`."""
