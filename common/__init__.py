"""Leaf helpers of the web side: imported by chatai, gateway and hpcbridge alike, importing none of them
(nor Django). ``env``: typed settings from the environment; ``upstream``: the events and the error of an
answer from upstream (an HPC platform or an external provider); ``expiring``: a small cache whose
entries expire."""
