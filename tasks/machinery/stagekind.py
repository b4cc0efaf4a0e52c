"""What a stage kind is: its name, typed config, typed input slots, output type, headline metrics and work
function (`StageKind`), and the value types that flow between stages. Each kind module under tasks/kinds/
declares one `KIND = StageKind(...)`; the registry (tasks/kinds/__init__.py) finds them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

ValueType = Literal["data", "policy", "reward", "report", "prompt"]
MODEL_OUTPUTS = ("policy", "reward")  # the outputs of the stages that train a model (registered as versions)
VALUE_TYPES: dict[str, str] = {
    "data": "prepared data sets (a prepare_data output)",
    "policy": "a causal language model (AutoModelForCausalLM)",
    "reward": "a reward model (AutoModelForSequenceClassification, one label)",
    "report": "an evaluation (metrics and sample generations)",
    "prompt": "a chosen prompt template (a prompt_search output, registered in the MLflow prompt registry)",
}


@dataclass(frozen=True)
class Slot:
    """One named input of a kind."""

    type: ValueType
    description: str
    required: bool = True
    # data slots: the data kinds (sft, preference, eval, ...) the stage reads, or a function of its config
    data: tuple[str, ...] | Callable[[Any], tuple[str, ...]] = ()


# work(config, inputs, out, ctx) -> metrics: `config` is the kind's typed config, `inputs` maps each
# slot to a local folder (or a Hub id), `out` is the folder to write the output into.
Work = Callable[[Any, dict[str, Any], Path, Any], dict[str, float]]


@dataclass(frozen=True)
class StageKind:
    name: str
    description: str
    config: type  # a tasks.machinery.training.Section subclass
    inputs: dict[str, Slot]
    output: ValueType
    work: Work
    headline: tuple[str, ...] = ()  # metric names or fnmatch patterns (*/task_accuracy), shown in this order
    # Any input name not in `inputs` is accepted as this type (evaluate compares any number of policies).
    more_inputs: Slot | None = None
    # Data kinds a data-producing stage provides, from its config (prepare_data).
    provides: Callable[[Any], set[str]] | None = None
    # The external inputs a stage reads directly from its config (prepare_data's sources, a judge's prompt
    # version), as refs: source_inputs(config, tracking_uri).
    source_inputs: Callable[[Any, str | None], dict[str, dict]] | None = None
    # The metric whose value is the MLflow step of the stage's summary metrics: where its curves end.
    step: str = "train/steps"
    # What the config needs from the inputs a recipe gives the instance (by slot name), in words:
    # input_problems(config, inputs); flows/graph.py reports them with the graph's other problems.
    input_problems: Callable[[Any, dict[str, str]], list[str]] | None = None
    # For a kind whose output depends on state outside the store (the model registry) and whose work changes
    # that state (registers, moves aliases): what a reproduction (RunEnv.reproduction_of) runs instead of
    # `work`, deciding again against the state the original run recorded and changing nothing.
    replay: Work | None = None

    @property
    def acts_on_world(self) -> bool:
        return self.replay is not None

    @property
    def module(self) -> str:
        return self.work.__module__

    def headline_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        import fnmatch

        shown: dict[str, float] = {}
        for pattern in self.headline:
            shown.update({k: v for k, v in metrics.items() if fnmatch.fnmatchcase(k, pattern) and k not in shown
                          and not k.endswith(("_ci_low", "_ci_high"))})
        return shown

    def slot(self, name: str) -> Slot | None:
        return self.inputs.get(name) or self.more_inputs

    def loop_slot(self) -> str | None:
        """The input a repeated instance's round k takes from round k-1: the one required slot of the output's type."""
        same = [name for name, slot in self.inputs.items() if slot.type == self.output and slot.required]
        return same[0] if len(same) == 1 else None
