"""posttrain's work: what a stage does, in three rooms, and the one generic Prefect task that runs a stage.

* `tasks/kinds/`: the stage kinds, one module per kind, named as the kind (sft, dpo, evaluate, ...). A kind
  may import blocks and machinery, never another kind.
* `tasks/blocks/`: method building blocks several kinds share (alignment trainers' settings, online RL,
  judges, generation, prompts, dedup, data shapes, the evaluation harness). A block may import other blocks
  and machinery, never a kind.
* `tasks/machinery/`: what every stage uses (the store, cache keys, tracking, sources, checkpoints, training
  arguments, launchers, hardware, logs, faults). Machinery imports machinery only.
* `tasks/stage.py`: the generic stage task (cache key, inputs, atomic output, MLflow child run) over the
  kind registry.

Nothing under tasks/ imports flows/ (tests/unit/test_imports.py guards every direction).
"""

# `module:function` settings (judge rules, verifiers, a simulated rater's truth) written before the split into
# rooms name the old flat modules: they still load.
MOVED_MODULES = {
    "tasks.store": "tasks.machinery.store",
    "tasks.tracking": "tasks.machinery.tracking",
    "tasks.cachekeys": "tasks.machinery.cachekeys",
    "tasks.sources": "tasks.machinery.sources",
    "tasks.fingerprints": "tasks.machinery.fingerprints",
    "tasks.checkpoints": "tasks.machinery.checkpoints",
    "tasks.training": "tasks.machinery.training",
    "tasks.launch": "tasks.machinery.launch",
    "tasks.ranks": "tasks.machinery.ranks",
    "tasks.hardware": "tasks.machinery.hardware",
    "tasks.logs": "tasks.machinery.logs",
    "tasks.faults": "tasks.machinery.faults",
    "tasks.figures": "tasks.machinery.figures",
    "tasks.modeling": "tasks.machinery.modeling",
    "tasks.gguf": "tasks.machinery.gguf",
    "tasks.chat": "tasks.machinery.chat",
    "tasks.ray_engine": "tasks.machinery.ray_engine",
    "tasks.splits": "tasks.machinery.splits",
    "tasks.synthetic": "tasks.machinery.synthetic",
    "tasks.align": "tasks.blocks.align",
    "tasks.online_rl": "tasks.blocks.online_rl",
    "tasks.judges": "tasks.blocks.judges",
    "tasks.generation": "tasks.blocks.generation",
    "tasks.prompts": "tasks.blocks.prompts",
    "tasks.dedup": "tasks.blocks.dedup",
    "tasks.shapes": "tasks.blocks.shapes",
    "tasks.harness": "tasks.blocks.harness",
    "tasks.scoring": "tasks.blocks.scoring",
    "tasks.teachers": "tasks.blocks.teachers",
    "tasks.word_problems": "tasks.blocks.word_problems",
    "tasks.data": "tasks.kinds.prepare_data",
    "tasks.pretrain": "tasks.kinds.pretrain",
    "tasks.sft": "tasks.kinds.sft",
    "tasks.reward": "tasks.kinds.reward",
    "tasks.dpo": "tasks.kinds.dpo",
    "tasks.kto": "tasks.kinds.kto",
    "tasks.rlhf": "tasks.kinds.rlhf",
    "tasks.rloo": "tasks.kinds.rloo",
    "tasks.spin": "tasks.kinds.spin",
    "tasks.online_dpo": "tasks.kinds.online_dpo",
    "tasks.elicit": "tasks.kinds.elicit",
    "tasks.synthesize": "tasks.kinds.synthesize",
    "tasks.prompt_search": "tasks.kinds.prompt_search",
    "tasks.evaluate": "tasks.kinds.evaluate",
    "tasks.promote": "tasks.kinds.promote",
}
