import json

import pytest

from xprompt.config import DType, TrainConfig


def test_config_json_round_trip():
    cfg = TrainConfig(task="pawsx", method="soft", shots=16, lr=0.03, dtype="fp32")
    back = TrainConfig.from_dict(json.loads(cfg.to_json()))
    assert back == cfg
    assert back.method == "soft" and back.dtype is DType.FP32
    assert json.loads(cfg.to_json())["method"] == "soft"


@pytest.mark.parametrize("field, value", [("prompt_length", 0), ("shots", 0), ("lr", 0.0), ("batch_size", 0),
                                          ("readout", "cls"), ("max_steps", -1)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field if field != "lr" else "lr must be"):
        TrainConfig(**{field: value})
