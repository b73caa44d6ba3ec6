"""The override rules as a pure function: no tensors, no state (DESIGN §3)."""
import pytest

from autosdpa.policy import NO_OVERRIDES, Overrides, resolve

ALL_ON = (True, True, True, True)


def test_nothing_set_measures_everything():
    p = resolve(NO_OVERRIDES, "tune", ALL_ON, priority_set=False)
    assert not p.passthrough and p.allowed is None and not p.forced and p.mode == "tune"


@pytest.mark.parametrize("overrides,default", [(Overrides(mode="off"), "tune"), (NO_OVERRIDES, "off"),
                                               (Overrides(mode="off", backends=("math",)), "tune")])
def test_mode_off_beats_everything(overrides, default):
    p = resolve(overrides, default, (False, False, True, False), priority_set=True)
    assert p.passthrough and "off" in p.reason


def test_own_mode_beats_the_environment_default():
    assert resolve(Overrides(mode="lookup"), "tune", ALL_ON, False).mode == "lookup"
    assert resolve(Overrides(mode="tune"), "lookup", ALL_ON, False).mode == "tune"
    assert resolve(NO_OVERRIDES, "lookup", ALL_ON, False).mode == "lookup"


def test_forced_backends_beat_pytorch_flags_and_priority():
    p = resolve(Overrides(backends=("flash", "math")), "tune", (False, False, True, False), priority_set=True)
    assert p.forced and p.allowed == ("flash", "math") and not p.torch_only and not p.passthrough


def test_priority_order_hands_the_choice_to_pytorch():
    p = resolve(NO_OVERRIDES, "tune", (False, True, True, True), priority_set=True)
    assert p.passthrough and "priority" in p.reason


@pytest.mark.parametrize("flags,allowed", [((False, True, True, True), ("efficient", "math", "cudnn")),
                                           ((False, False, True, False), ("math",)),
                                           ((True, False, False, False), ("flash",))])
def test_pytorch_flags_restrict_to_pytorch_backends_still_on(flags, allowed):
    p = resolve(NO_OVERRIDES, "tune", flags, priority_set=False)
    assert p.allowed == allowed and p.torch_only and not p.forced and "sdpa" in p.reason


def test_lookup_mode_survives_flag_restriction():
    p = resolve(Overrides(mode="lookup"), "tune", (False, False, True, False), priority_set=False)
    assert p.mode == "lookup" and p.allowed == ("math",)
