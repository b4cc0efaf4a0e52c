"""Machinery every stage uses, whatever its method: the artifact store (local or S3), cache keys, MLflow
tracking, data sources and their fingerprints, store-backed checkpoints, training arguments and logs, the
launchers (one process, torchrun ranks, a Ray cluster), hardware facts, fault points, model loading (Hub
ids, local folders, GGUF files), chat templates, prepared splits, and what a stage kind is (`stagekind`)
and runs with (`context`).

Machinery imports only machinery: never a block (tasks/blocks/), a kind (tasks/kinds/), the stage task or
flows/.
"""
