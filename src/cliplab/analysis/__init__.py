"""Analyses of a model's features (eval level, rank 5): SCE (paper 20), concept-association bias (paper 25) and
effective robustness (paper 22). Each registers itself in :mod:`cliplab.analysis.registry`, which ``cliplab methods``
lists; the modules import only numpy at load time (torch and the data layer inside their functions)."""
