"""The persistent SSH link to each HPC platform (and the local transport)."""
