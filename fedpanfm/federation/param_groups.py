"""Which aggregation rule each state-dict key falls under (docs/architecture.md, key table).

The server never looks inside modules: it classifies every ``PanFMSSL`` state-dict key by its
name alone. The key layout is part of the model's contract:

==========================================================  ==============  ====================
key                                                          kind            server rule
==========================================================  ==============  ====================
``{student,teacher}.encoder.tokenizer.organs.<organ>.*``     organ           mean over holders
``{student,teacher}.encoder.blocks.<l>.mlp.experts.<e>.*``   expert (l, e)   mean by gate mass
``{student,teacher}.encoder.blocks.<l>.mlp.director.*``      director (l)    group EMA (server)
``{student,teacher}.encoder.blocks.<l>.mlp.gate_mass_acc``   accumulator     reset to zero
anything else                                                shared          mean by subjects
==========================================================  ==============  ====================

Buffers (our decision, docs/federation.md "Buffers"): ``gate_mass_acc`` counts a site's routed
gate mass since its last local group-EMA step; the server has just done the group-EMA step of
the round, so the global value is zero (a fresh count). ``usage`` (the router's usage EMA), the
loss centres (``dino_loss.center``, ``ibot_loss.center``) and ``masker.*`` are running estimates
of the whole population, so they are shared means weighted by subjects like any other shared
tensor.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, TypeAlias

Role = Literal["student", "teacher", "other"]
Kind = Literal["organ", "expert", "director", "accumulator", "shared"]

_ORGAN = re.compile(r"^(student|teacher)\.encoder\.tokenizer\.organs\.([A-Za-z0-9_]+)\.")
_EXPERT = re.compile(r"^(student|teacher)\.encoder\.blocks\.(\d+)\.mlp\.experts\.(\d+)\.")
_DIRECTOR = re.compile(r"^(student|teacher)\.encoder\.blocks\.(\d+)\.mlp\.director\.")
_ACCUMULATOR = re.compile(r"^(student|teacher)\.encoder\.blocks\.(\d+)\.mlp\.gate_mass_acc$")
_ROLE = re.compile(r"^(student|teacher)\.")


@dataclass(frozen=True, order=True)
class ParamGroup:
    """The aggregation group a key belongs to (hashable: it is its own group id).

    Args:
        role: "student" or "teacher" (the network the key lives in), "other" for keys outside
            both (loss centres, masker state).
        kind: "organ", "expert", "director", "accumulator" or "shared" (see the module table).
        organ: the organ name for kind "organ", else None.
        layer: the block index for kinds "expert", "director" and "accumulator", else None.
        expert: the expert index for kind "expert", else None.
    """

    role: Role
    kind: Kind
    organ: str | None = None
    layer: int | None = None
    expert: int | None = None

    def __str__(self) -> str:
        where = self.organ if self.organ is not None else ""
        if self.layer is not None:
            where = f"layer{self.layer}" + (f"/e{self.expert}" if self.expert is not None else "")
        return f"{self.role}/{self.kind}" + (f"/{where}" if where else "")


GroupId: TypeAlias = ParamGroup


# Cached: the server classifies every key of every update several times a round (checks,
# plan, directors); ParamGroup is frozen, so sharing one per key is safe (docs/performance.md).
@functools.lru_cache(maxsize=1 << 16)
def classify(key: str) -> ParamGroup:
    """The :class:`ParamGroup` of one state-dict key (by the exact key layout above)."""
    if m := _ORGAN.match(key):
        return ParamGroup(m[1], "organ", organ=m[2])  # type: ignore[arg-type]
    if m := _EXPERT.match(key):
        return ParamGroup(m[1], "expert", layer=int(m[2]), expert=int(m[3]))  # type: ignore[arg-type]
    if m := _DIRECTOR.match(key):
        return ParamGroup(m[1], "director", layer=int(m[2]))  # type: ignore[arg-type]
    if m := _ACCUMULATOR.match(key):
        return ParamGroup(m[1], "accumulator", layer=int(m[2]))  # type: ignore[arg-type]
    if m := _ROLE.match(key):
        return ParamGroup(m[1], "shared")  # type: ignore[arg-type]
    return ParamGroup("other", "shared")


_MASKER = re.compile(r"^masker\.")
_CENTRE = re.compile(r"^[A-Za-z0-9_]+_loss\.center$")


def is_site_masker(key: str) -> bool:
    """Whether ``key`` is the organ masker's state (the site's running organ saliency)."""
    return classify(key).role == "other" and bool(_MASKER.match(key))


def is_teacher_centre(key: str) -> bool:
    """Whether ``key`` is a loss's teacher-output centre (``dino_loss.center``, ``ibot_loss.center``)."""
    return classify(key).role == "other" and bool(_CENTRE.match(key))


def group_keys(keys: Iterable[str]) -> dict[GroupId, list[str]]:
    """Keys bucketed by group, each bucket in the order the keys came (groups sorted)."""
    out: dict[GroupId, list[str]] = {}
    for key in keys:
        out.setdefault(classify(key), []).append(key)
    return dict(sorted(out.items()))


def counterpart(key: str, role: Literal["student", "teacher"]) -> str:
    """The same key in the other network: ``teacher.X`` <-> ``student.X``.

    Raises ValueError for a key outside student/teacher.
    """
    m = _ROLE.match(key)
    if not m:
        raise ValueError(f"key {key!r} belongs to neither the student nor the teacher")
    return role + key[len(m[1]):]


def module_suffix(key: str, group: ParamGroup) -> str:
    """The key relative to its director / expert module (e.g. ``fc1.weight``), so the director
    and its experts line up parameter by parameter."""
    if group.kind == "director":
        marker = ".mlp.director."
    elif group.kind == "expert":
        marker = f".mlp.experts.{group.expert}."
    else:
        raise ValueError(f"key {key!r}: no module suffix for a {group.kind} group")
    return key.split(marker, 1)[1]


__all__ = ["GroupId", "Kind", "ParamGroup", "Role", "classify", "counterpart", "group_keys", "is_site_masker",
           "is_teacher_centre", "module_suffix"]
