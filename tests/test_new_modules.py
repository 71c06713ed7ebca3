"""passes.rewrite.NewModules: the targets a rewrite gives the modules it adds."""

from torch import nn

from fxqbn.passes.rewrite import NewModules


def root():
    model = nn.Module()
    model.fxqbn_lowered_bn = nn.Identity()  # a user's attribute that happens to hold the name
    model.block = nn.Sequential(nn.BatchNorm2d(3))
    return model


def test_named_never_takes_a_root_attribute_or_an_earlier_target():
    new, a, b, c = NewModules(root()), nn.ReLU(), nn.ReLU(), nn.ReLU()
    assert new.named("fxqbn_lowered_bn", a) == "fxqbn_lowered_bn_1"
    assert new.named("fxqbn_lowered_bn", b) == "fxqbn_lowered_bn_2"
    assert new.named("fxqbn_lowered_bn2", c) == "fxqbn_lowered_bn2"
    assert new.modules == {"fxqbn_lowered_bn_1": a, "fxqbn_lowered_bn_2": b, "fxqbn_lowered_bn2": c}


def test_replacing_takes_the_replaced_modules_name_once_then_fresh_ones():
    new = NewModules(root())
    assert new.named("block.0", nn.ReLU(), replacing=True) == "block.0"  # where the float BN was
    assert new.named("block.0", nn.ReLU(), replacing=True) == "block.0_1"  # the same BN called twice
    assert new.add("fxqbn_quantize_", nn.ReLU()) == "fxqbn_quantize_0"
