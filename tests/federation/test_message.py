"""The wire format: round trips, fp32 on the wire, and every malformed field rejected by name."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import fake_site_update, tiny_config
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedpanfm.federation.protocol import PROTOCOL_VERSION, SiteUpdate, TrainInstruction
from fedpanfm.federation.tensor_codec import MessageError, arrayrecord_to_state, state_to_arrayrecord

ORGANS = list(tiny_config().data.organ_set().names)


def small_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "student.encoder.norm.weight": torch.randn(4, generator=g),
        "student.encoder.blocks.0.mlp.experts.1.fc1.weight": torch.randn(3, 4, generator=g).t(),  # non-contiguous
        "masker.local_count": torch.arange(7, dtype=torch.float32),
    }


def make_update(**changes) -> SiteUpdate:
    fields = dict(
        site="site_a",
        state=small_state(),
        num_examples=10,
        organ_subjects=torch.tensor([10, 4, 0, 10, 2, 2, 1], dtype=torch.float64),
        gate_mass=torch.arange(8, dtype=torch.float64).reshape(2, 4),
        saliency=torch.full((7,), 1 / 7, dtype=torch.float64),
        organ_names=ORGANS,
        metrics={"loss/total": 2.5, "mask_rate/heart": 0.25},
        steps=4,
    )
    fields.update(changes)
    return SiteUpdate(**fields)


def test_train_instruction_round_trip():
    state = small_state()
    ins = TrainInstruction(state_to_arrayrecord(state), 2, 5, 40, 100, [0.5] + [0.5 / 6] * 6, ORGANS, "server_ema")
    back = TrainInstruction.from_recorddict(ins.to_recorddict(), ORGANS)
    assert (back.server_round, back.num_rounds, back.start_step, back.total_steps) == (2, 5, 40, 100)
    assert back.global_saliency == pytest.approx(ins.global_saliency)
    assert back.teacher_policy == "server_ema" and back.organ_names == ORGANS
    got = back.state()
    assert set(got) == set(state)
    for k in state:
        assert torch.equal(got[k], state[k])


def test_site_update_round_trip_casts_bf16_to_fp32():
    state = small_state()
    state["student.encoder.norm.weight"] = state["student.encoder.norm.weight"].to(torch.bfloat16)
    upd = make_update(state=state)
    rd = upd.to_recorddict()
    assert rd["arrays"]["student.encoder.norm.weight"].dtype == "float32"
    back = SiteUpdate.from_recorddict(rd, ORGANS)
    assert back.site == "site_a" and back.num_examples == 10 and back.steps == 4
    assert torch.equal(back.state["student.encoder.norm.weight"], state["student.encoder.norm.weight"].float())
    assert torch.equal(back.state["student.encoder.blocks.0.mlp.experts.1.fc1.weight"],
                       state["student.encoder.blocks.0.mlp.experts.1.fc1.weight"])
    assert torch.equal(back.gate_mass, upd.gate_mass) and back.gate_mass.shape == (2, 4)
    assert torch.equal(back.organ_subjects, upd.organ_subjects)
    assert back.metrics == {"loss/total": 2.5, "mask_rate/heart": 0.25}


def test_reply_is_a_flower_fedavg_reply():
    # FedAvg's contract: one ArrayRecord, one MetricRecord holding "num-examples".
    rd = make_update().to_recorddict()
    assert len(rd.array_records) == 1 and len(rd.metric_records) == 1
    assert rd["metrics"]["num-examples"] == 10


def _mutate(rd: RecordDict, record: str, key: str, value) -> RecordDict:
    if value is None:
        del rd[record][key]
    else:
        rd[record][key] = value
    return rd


@pytest.mark.parametrize(
    "record,key,value,needle",
    [
        ("site", "protocol-version", PROTOCOL_VERSION + 1, "protocol version"),
        ("site", "site-name", "", "site-name"),
        ("site", "organ-names", list(reversed(ORGANS)), "organ vocabulary"),
        ("metrics", "num-examples", None, "num-examples"),
        ("metrics", "num-examples", 0, "num-examples"),
        ("metrics", "organ-subjects", [1.0] * 6, "organ-subjects"),
        ("metrics", "organ-subjects", [11.0] + [1.0] * 6, "exceeds num-examples"),
        ("metrics", "saliency", [math.nan] * 7, "saliency"),
        ("metrics", "gate-mass-shape", [3, 4], "gate-mass"),
        ("metrics", "gate-mass", [-1.0] * 8, "gate-mass"),
        ("metrics", "loss/total", math.inf, "loss/total"),
        ("metrics", "steps", None, "steps"),
    ],
)
def test_malformed_reply_is_rejected_with_the_field_named(record, key, value, needle):
    rd = _mutate(make_update().to_recorddict(), record, key, value)
    with pytest.raises(MessageError) as err:
        SiteUpdate.from_recorddict(rd, ORGANS, sender="node 7")
    assert needle in err.value.reason and "node 7" in err.value.reason


def test_nan_weights_are_rejected_naming_the_key():
    state = small_state()
    state["student.encoder.norm.weight"][2] = float("nan")
    with pytest.raises(MessageError, match=r"student\.encoder\.norm\.weight.*NaN"):
        SiteUpdate.from_recorddict(make_update(state=state).to_recorddict(), ORGANS)


def test_fp64_arrays_are_rejected():
    rd = make_update().to_recorddict()
    rd["arrays"] = ArrayRecord({"x": torch.zeros(2, dtype=torch.float64)})
    with pytest.raises(MessageError, match="float64"):
        SiteUpdate.from_recorddict(rd, ORGANS)


def test_missing_record_is_named():
    rd = make_update().to_recorddict()
    del rd["metrics"]
    with pytest.raises(MessageError, match="MetricRecord 'metrics'"):
        SiteUpdate.from_recorddict(rd, ORGANS)


def test_reserved_metric_name_cannot_be_sent():
    with pytest.raises(MessageError, match="reserved"):
        make_update(metrics={"saliency": 1.0}).to_recorddict()


def test_instruction_checks_policy_and_round():
    ins = TrainInstruction(ArrayRecord(), 1, 3, 0, 10, [1 / 7] * 7, ORGANS, "aggregate")
    rd = ins.to_recorddict()
    rd["fedpanfm"]["teacher-policy"] = "magic"
    with pytest.raises(MessageError, match="teacher-policy"):
        TrainInstruction.from_recorddict(rd)
    rd = ins.to_recorddict()
    rd["fedpanfm"]["server-round"] = 4
    with pytest.raises(MessageError, match="exceeds num-rounds"):
        TrainInstruction.from_recorddict(rd)
    with pytest.raises(MessageError, match="organ vocabulary"):
        TrainInstruction.from_recorddict(ins.to_recorddict(), ORGANS[:-1])


def test_real_model_state_round_trips_exactly():
    cfg = tiny_config()
    from conftest import global_model_state

    state = global_model_state(cfg)
    back = arrayrecord_to_state(state_to_arrayrecord(state))
    assert list(back) == list(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    upd = fake_site_update(cfg, state, "s", 5)
    assert SiteUpdate.from_recorddict(upd.to_recorddict(), ORGANS).gate_mass.shape == (cfg.model.depth, cfg.model.dex.experts)


def test_record_types_are_checked():
    rd = make_update().to_recorddict()
    rd["site"] = MetricRecord({"protocol-version": 1})
    with pytest.raises(MessageError, match="expected ConfigRecord"):
        SiteUpdate.from_recorddict(rd, ORGANS)
    assert isinstance(make_update().to_recorddict()["site"], ConfigRecord)
