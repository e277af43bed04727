"""Shared: the config schema, its validation and checks, the plan of what a config runs, the
views, what a run needs of the machine, and the typed settings that the stages take instead of the
config dict.

Modules: ``schema`` (keys, defaults, descriptions), ``validation`` (schema and cross-key checks,
with errors that name the key; the defaults that adapt to the run), ``plan`` (models, views, pairs,
runs; pure functions of the config), ``views`` (the one definition of a view), ``sections`` (the
settings of the sections that planning reads: eigen, overlap, scaling), ``settings`` (frozen
dataclasses built from the config, one per stage; re-exports those of ``sections``), ``sources``
(the folders of local models and the files of a local corpus, checked at parse time), ``needs``
(a CUDA GPU, a larger corpus, the hub or PyPI: warnings before any job), ``disk`` (the score stores
a config writes, their size, and the free disk they must fit, checked at parse time).
"""
