"""AugLocal's depth pyramid and uniform selection reproduce the reference implementation's lists."""
import pytest

from auglocal_fx import depth_schedule, select_aux_units


def test_resnet32_depths_all_two():
    # K=16, d=2, tau=0.5: the smallest value, 1.5, rounds (to even) to 2.
    assert depth_schedule(16, aux_depth=2, pyramid=0.5) == [2] * 15


def test_resnet110_depths_three_then_two():
    depths = depth_schedule(55, aux_depth=3, pyramid=0.5)
    assert depths == [3] * 27 + [2] * 27


def test_imagenet_resnet34_no_pyramid():
    assert depth_schedule(17, aux_depth=4, pyramid=0.0) == [4] * 16


def test_pyramid_one_shrinks_to_one():
    depths = depth_schedule(10, aux_depth=5, pyramid=1.0)
    assert depths[0] == 5 and depths[-1] == 1
    assert depths == sorted(depths, reverse=True)


@pytest.mark.parametrize(
    "end, units, depth, expected",
    [(0, 16, 2, [8, 15]), (3, 16, 2, [9, 15]), (13, 16, 2, [14, 15]), (14, 16, 2, [15]),
     (0, 55, 3, [18, 36, 54]), (26, 55, 3, [35, 45, 54]), (27, 55, 2, [40, 54]), (53, 55, 2, [54])],
)
def test_uniform_selection_matches_reference(end, units, depth, expected):
    assert select_aux_units(end, units, depth) == expected


def test_selection_always_ends_with_last_unit():
    for end in range(15):
        for depth in (1, 2, 3, 7):
            assert select_aux_units(end, 16, depth)[-1] == 15


@pytest.mark.parametrize("depth, tau", [(0, 0.5), (2, -0.1), (2, 1.5), (1.5, 0.5), (True, 0.5)])
def test_bad_schedule_arguments(depth, tau):
    with pytest.raises(ValueError):
        depth_schedule(8, aux_depth=depth, pyramid=tau)
