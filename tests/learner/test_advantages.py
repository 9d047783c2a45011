import math

import pytest
import torch

from covrl.advantages import ESTIMATORS, compute_advantages


def test_registry_has_all_estimators():
    assert {"grpo", "drgrpo", "rloo", "reinforce_pp"} <= set(ESTIMATORS)


def test_grpo_group_normalised():
    r = [1.0, 0.0, 0.0, 0.0, 2.0, 4.0]
    g = ["a", "a", "a", "a", "b", "b"]
    adv = compute_advantages("grpo", r, g)
    ra = torch.tensor(r[:4], dtype=torch.float64)
    exp_a = (ra - ra.mean()) / (ra.std() + 1e-6)
    torch.testing.assert_close(adv[:4], exp_a.float())
    rb = torch.tensor([2.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(adv[4:], ((rb - 3.0) / (rb.std() + 1e-6)).float())


def test_drgrpo_mean_only():
    adv = compute_advantages("drgrpo", [1.0, 0.0, 3.0, 5.0], [0, 0, 1, 1])
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -1.0, 1.0]))


def test_rloo_leave_one_out():
    r = [1.0, 2.0, 6.0]
    adv = compute_advantages("rloo", r, [7, 7, 7])
    expected = [1.0 - 4.0, 2.0 - 3.5, 6.0 - 1.5]
    torch.testing.assert_close(adv, torch.tensor(expected))


def test_reinforce_pp_global_and_group_baseline():
    r = [1.0, 0.0, 3.0, 5.0]
    adv = compute_advantages("reinforce_pp", r, [0, 0, 1, 1])
    rt = torch.tensor(r, dtype=torch.float64)
    torch.testing.assert_close(adv, ((rt - rt.mean()) / (rt.std() + 1e-6)).float())
    adv_b = compute_advantages("reinforce_pp", r, [0, 0, 1, 1], group_baseline=True)
    c = torch.tensor([0.5, -0.5, -1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(adv_b, ((c - c.mean()) / (c.std() + 1e-6)).float())


@pytest.mark.parametrize("name", sorted(ESTIMATORS))
def test_singletons_and_constant_groups_no_nan(name):
    adv = compute_advantages(name, [1.0, 3.0, 3.0, 0.5], ["x", "y", "y", "z"])
    assert torch.isfinite(adv).all()
    if name != "reinforce_pp":
        torch.testing.assert_close(adv, torch.zeros(4))
    adv1 = compute_advantages(name, [2.0], [0])
    assert torch.isfinite(adv1).all() and adv1.shape == (1,)


def test_errors_name_the_field():
    with pytest.raises(ValueError, match="advantage estimator"):
        compute_advantages("ppo", [1.0], [0])
    with pytest.raises(ValueError, match="group_ids"):
        compute_advantages("grpo", [1.0, 2.0], [0])
    with pytest.raises(ValueError, match=r"rewards\[1\]"):
        compute_advantages("grpo", [1.0, math.nan], [0, 0])
    with pytest.raises(ValueError, match="rewards must be non-empty"):
        compute_advantages("grpo", [], [])
    with pytest.raises(ValueError, match="eps"):
        compute_advantages("grpo", [1.0, 2.0], [0, 0], eps=-1)
    with pytest.raises(ValueError, match="bad keyword"):
        compute_advantages("drgrpo", [1.0, 2.0], [0, 0], eps=1e-3)
