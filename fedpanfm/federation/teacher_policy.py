"""The teacher policy, in one place: what a site keeps, what it sends, how the server builds the
global teacher (``federation.teacher_policy``; docs/federation.md, "Teacher").

=============  =========================  ==================  ===============================
policy         a site keeps for itself    a site sends        the server's global teacher
=============  =========================  ==================  ===============================
server_ema     its masker                 the student         EMA of the new global student
aggregate      its masker                 student + teacher   the sites' teachers, averaged
local          masker, teacher, centres   the student         unchanged (sites keep theirs)
=============  =========================  ==================  ===============================

"Masker" is the site's running organ saliency (``masker.*``), which SGM blends with the
federation's; "centres" are the teacher-output centres of the losses (``*_loss.center``), which
belong with a teacher the site keeps (FedU / FedEMA style).
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from fedpanfm.config import TeacherPolicy
from fedpanfm.federation.param_groups import Role, classify, counterpart, is_site_masker, is_teacher_centre

#: Every policy the config accepts (its Literal), in the config's order.
TEACHER_POLICIES: tuple[str, ...] = typing.get_args(TeacherPolicy)


def site_keeps(keys: Iterable[str], policy: TeacherPolicy) -> list[str]:
    """The state-dict keys a site keeps for itself and lays over the global weights it loads."""
    local_teacher = policy == "local"
    return [k for k in keys
            if is_site_masker(k) or (local_teacher and (classify(k).role == "teacher" or is_teacher_centre(k)))]


def site_sends_teacher(policy: TeacherPolicy) -> bool:
    """Whether a site's reply carries its teacher (the server reads it only to average it)."""
    return policy == "aggregate"


def averaged_roles(policy: TeacherPolicy) -> tuple[Role, ...]:
    """The networks whose site copies the server averages (and whose directors it updates)."""
    return ("student", "teacher") if site_sends_teacher(policy) else ("student",)


def server_ema_teacher(student: Mapping[str, Tensor], previous_teacher: Mapping[str, Tensor], momentum: float) -> dict[str, Tensor]:
    """Global teacher = m * previous global teacher + (1 - m) * new global student, key by key.

    Args:
        student: the new global state (student keys are read).
        previous_teacher: the previous global teacher entries (``teacher.*`` keys).
        momentum: m in [0, 1].
    """
    out: dict[str, Tensor] = {}
    for key, prev in previous_teacher.items():
        s = student[counterpart(key, "student")]
        if prev.dtype.is_floating_point:
            # One fused pass (lerp: prev + (1 - m) * (s - prev)) in the tensor's own precision;
            # the float64 temporaries it replaces made this the slowest part of a 100M round
            # (docs/performance.md). Differs from the float64 form by float round-off only.
            out[key] = torch.lerp(prev, s.to(prev.dtype), 1.0 - momentum)
        else:
            out[key] = s
    return out


def global_teacher(policy: TeacherPolicy, state: Mapping[str, Tensor], previous: Mapping[str, Tensor],
                   momentum: float) -> dict[str, Tensor]:
    """The teacher entries the new global state still lacks after the means.

    Args:
        policy: the teacher policy.
        state: the new global state so far (under "aggregate" it already holds the averaged teacher).
        previous: the global state before the round.
        momentum: ``federation.server_teacher_momentum`` (used by "server_ema").
    """
    teacher = {k: t for k, t in previous.items() if classify(k).role == "teacher" and k not in state}
    if policy == "server_ema":
        return server_ema_teacher(state, teacher, momentum)
    # "local": the sites keep their own teacher; the global teacher entries stay as they were.
    return teacher


__all__ = ["TEACHER_POLICIES", "averaged_roles", "global_teacher", "server_ema_teacher", "site_keeps",
           "site_sends_teacher"]
