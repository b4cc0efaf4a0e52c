"""Method building blocks several stage kinds share: the alignment trainers' common settings (`align`),
online RL (`online_rl`), judges and reward functions (`judges`, `scoring`, `teachers`), generation
(`generation`), prompt templates (`prompts`), duplicate and contamination detection (`dedup`), the public
data sets' shapes (`shapes`), the lm-evaluation-harness bridge (`harness`) and the word-problem verifiers.

A block imports other blocks and machinery (tasks/machinery/), never a kind (tasks/kinds/), the stage task
or flows/.
"""
