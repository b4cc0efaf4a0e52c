"""The recipe's stage graph: validation, order, rounds, and the selection `--only` / `--from` make.

Each instance becomes one node, or one node per round (`<name>.round<k>`) when it repeats; round k
takes round k-1's output in the input slot of its own output type, and later stages read the last
round. Nodes come in dependency order, recipe order among equals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tasks.machinery.stagekind import VALUE_TYPES, StageKind
from tasks.kinds import get
from tasks.machinery.modeling import is_model_reference

if TYPE_CHECKING:
    from flows.config import PipelineConfig


@dataclass
class Node:
    name: str  # the instance, or <instance>.round<k>
    instance: str
    kind: StageKind
    settings: dict
    stage_inputs: dict[str, str] = field(default_factory=dict)  # slot -> node name
    model_inputs: dict[str, str] = field(default_factory=dict)  # slot -> external model reference
    round: int = 1

    @property
    def upstream(self) -> list[str]:
        return list(self.stage_inputs.values())


@dataclass(frozen=True)
class Producer:
    """What an instance's output is, as the instances reading it see it."""

    kind: str
    output: str
    data_kinds: frozenset[str] = frozenset()


def producer_of(inst) -> Producer:
    kind = get(inst.kind)
    return Producer(inst.kind, kind.output, frozenset(kind.provides(inst)) if kind.provides else frozenset())


def instance_problems(name: str, inst, producers: dict[str, Producer], known: list[str]) -> list[str]:
    """Problems of one instance's inputs, each naming it: unknown input, missing or unknown slot, wrong type,
    data kind not prepared, a repeat without a loop slot. `producers`: the stages it may read."""
    problems = []
    kind = get(inst.kind)
    where = f"stages.{name}"
    for slot_name, slot in kind.inputs.items():
        if slot.required and slot_name not in inst.inputs:
            problems.append(f"{where}.inputs: missing input {slot_name!r} ({VALUE_TYPES[slot.type]}: "
                            f"{slot.description})")
    if kind.input_problems:
        problems += [f"{where}: {problem}" for problem in kind.input_problems(inst, dict(inst.inputs))]
    for slot_name, value in inst.inputs.items():
        slot = kind.slot(slot_name)
        at = f"{where}.inputs.{slot_name}"
        if slot is None:
            problems.append(f"{at}: a {kind.name} stage has no input {slot_name!r} "
                            f"(its inputs: {', '.join(kind.inputs) or 'none'})")
        elif value in producers:
            producer = producers[value]
            if producer.output != slot.type:
                problems.append(f"{at}: {value!r} is a {producer.kind} stage, whose output is "
                                f"{VALUE_TYPES[producer.output]}; {slot_name!r} needs {VALUE_TYPES[slot.type]}")
            reads = slot.data(inst) if callable(slot.data) else slot.data
            for data_kind in reads if producer.output == slot.type else ():
                if data_kind not in producer.data_kinds:
                    problems.append(f"{at}: {name} reads {data_kind} data, but {value!r} prepares none "
                                    f"(set its `{data_kind}` source)")
        elif is_model_reference(value):
            if slot.type not in ("policy", "reward"):
                problems.append(f"{at}: {value!r} is a model, but {slot_name!r} needs {VALUE_TYPES[slot.type]} "
                                f"(the name of a {slot.type}-producing stage)")
        else:
            problems.append(f"{at}: {value!r} is no stage of this recipe ({', '.join(known)}) and not a model "
                            "reference (Hub id org/name[@revision], local path, s3://..., models:/name@alias)")
    if getattr(inst, "rounds", 1) > 1 and kind.loop_slot() is None:
        problems.append(f"{where}.rounds: a {kind.name} stage cannot repeat: none of its inputs takes its own "
                        f"output ({kind.output})")
    return problems


def graph_problems(cfg: "PipelineConfig") -> list[str]:
    """Every problem of the graph: each instance's (instance_problems), and cycles."""
    producers = {name: producer_of(inst) for name, inst in cfg.stages.items()}
    problems = [p for name, inst in cfg.stages.items()
                for p in instance_problems(name, inst, producers, list(cfg.stages))]
    cycle = _find_cycle({n: [v for v in i.inputs.values() if v in cfg.stages] for n, i in cfg.stages.items()})
    if cycle:
        problems.append(f"stages: the inputs form a cycle: {' -> '.join(cycle)}")
    return problems


def _find_cycle(edges: dict[str, list[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 visiting, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for up in edges.get(node, []):
            if state.get(up) == 1:
                return path[path.index(up):] + [up]
            if up not in state and (found := visit(up)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in edges:
        if node not in state and (found := visit(node)):
            return found
    return None


def instance_settings(instance) -> dict:
    """An instance's settings as its kind's config dict (what the stage task receives and keys on)."""
    return instance.model_dump(mode="json", exclude={"kind", "inputs", "rounds"})


def build_nodes(cfg: "PipelineConfig") -> list[Node]:
    """The nodes to run, in dependency order (recipe order among nodes whose inputs are ready)."""
    last_round = {name: (name if inst.rounds == 1 else f"{name}.round{inst.rounds}")
                  for name, inst in cfg.stages.items()}
    nodes: dict[str, Node] = {}
    for name, inst in cfg.stages.items():
        kind = get(inst.kind)
        for k in range(1, inst.rounds + 1):
            node = Node(name=name if inst.rounds == 1 else f"{name}.round{k}", instance=name, kind=kind,
                        settings=instance_settings(inst), round=k)
            for slot, value in inst.inputs.items():
                if k > 1 and slot == kind.loop_slot():
                    node.stage_inputs[slot] = f"{name}.round{k - 1}"
                elif value in cfg.stages:
                    node.stage_inputs[slot] = last_round[value]
                else:
                    node.model_inputs[slot] = value
            nodes[node.name] = node
    ordered: list[Node] = []
    done: set[str] = set()
    while len(ordered) < len(nodes):
        ready = [n for n in nodes.values() if n.name not in done and all(u in done for u in n.upstream)]
        if not ready:  # graph_problems reports cycles before this is reached
            raise ValueError("the stage graph has a cycle")
        ordered.append(ready[0])
        done.add(ready[0].name)
    return ordered


def with_upstream(nodes: list[Node], names: set[str]) -> set[str]:
    """`names` and every node they read, directly or not."""
    by_name = {n.name: n for n in nodes}
    found, todo = set(names), list(names)
    while todo:
        for up in by_name[todo.pop()].upstream:
            if up not in found:
                found.add(up)
                todo.append(up)
    return found


def downstream_of(nodes: list[Node], names: set[str]) -> set[str]:
    """`names` and every node that reads them, directly or not."""
    found = set(names)
    for node in nodes:  # dependency order: one pass suffices
        if any(u in found for u in node.upstream):
            found.add(node.name)
    return found


def node_names(nodes: list[Node], name: str) -> set[str]:
    """The nodes of an instance (all its rounds) or one round, by name."""
    matched = {n.name for n in nodes if n.name == name or n.instance == name}
    if not matched:
        raise KeyError(f"{name!r} is no stage of this recipe (stages: {', '.join(dict.fromkeys(n.instance for n in nodes))})")
    return matched
