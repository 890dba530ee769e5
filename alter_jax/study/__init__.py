"""Studies: multi-stage, resumable experiments whose reports are committed under ``studies/``.

``bin/study <name>`` runs one (see :mod:`alter_jax.cli.study`).
"""
