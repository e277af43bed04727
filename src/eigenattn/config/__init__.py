"""Shared: the config schema, its validation and checks, the plan of what a config runs, the
views, and the typed settings that the stages take instead of the config dict.

Modules: ``schema`` (keys, defaults, descriptions), ``validation`` (schema and cross-key checks,
with errors that name the key), ``plan`` (models, views, pairs, runs; pure functions of the
config), ``views`` (the one definition of a view), ``settings`` (frozen dataclasses built from
the config, one per stage), ``sources`` (the folders of local models, checked at parse time).
"""
