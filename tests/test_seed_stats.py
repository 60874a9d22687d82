"""The Student-t and Welch intervals behind the report, against closed forms, tables and torch's t density."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from launchers.reporting.seed_stats import mean_interval, t_cdf, t_quantile, welch_interval


def test_t_quantile_with_one_degree_of_freedom_is_cauchy():
    # t with 1 dof is the Cauchy distribution: F^-1(p) = tan(pi (p - 1/2)); p = 0.975 -> tan(0.475 pi) = 12.7062
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(0.475 * math.pi), rel=1e-10)


def test_t_quantile_with_two_degrees_of_freedom_has_closed_form():
    # dof 2: F^-1(p) = (2p - 1) / sqrt(2 p (1 - p)); p = 0.975 -> 0.95 / sqrt(0.04875) = 4.302653 (3 seeds)
    assert t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-10)


@pytest.mark.parametrize(("dof", "tabled"), [(4, 2.776445), (9, 2.262157), (29, 2.045230)])
def test_t_quantile_matches_printed_tables(dof, tabled):
    # two-sided 95 % critical values of Student's t, as printed in statistics tables (6 decimals)
    assert t_quantile(0.975, dof) == pytest.approx(tabled, abs=1e-6)


def test_t_quantile_tends_to_the_normal_quantile():
    # t_{0.975, nu} = z + (z^3 + z) / (4 nu) + O(nu^-2), z = 1.959964: nu = 1e6 adds 2.4e-6
    z = statistics.NormalDist().inv_cdf(0.975)
    assert t_quantile(0.975, 1e6) == pytest.approx(z + (z**3 + z) / 4e6, abs=1e-9)


@pytest.mark.parametrize("dof", [1.5, 3.7, 12.25])
def test_t_quantile_for_fractional_dof_holds_95_percent_of_torch_student_t_density(dof):
    # Welch's dof are fractional: integrate torch's StudentT density between -q and q (trapezoid rule)
    q = t_quantile(0.975, dof)
    grid = torch.linspace(-q, q, 400_001, dtype=torch.float64)
    density = torch.distributions.StudentT(torch.tensor(dof, dtype=torch.float64)).log_prob(grid).exp()
    assert float(torch.trapezoid(density, grid)) == pytest.approx(0.95, abs=1e-9)


@example(p=0.5000000000000001, dof=1.0)  # near t = 0 the tail form of t_cdf rounded to exactly 1/2
@given(p=st.floats(0.5, 0.9999), dof=st.floats(0.5, 500))
def test_t_cdf_inverts_t_quantile(p, dof):
    assert t_cdf(t_quantile(p, dof), dof) == pytest.approx(p, abs=1e-9)


@given(t=st.floats(-50, 50), dof=st.floats(0.5, 500))
def test_t_cdf_is_symmetric_about_zero(t, dof):
    assert t_cdf(-t, dof) == pytest.approx(1 - t_cdf(t, dof), abs=1e-12)


def test_mean_interval_of_three_seeds():
    # values 1, 2, 3: mean 2, s = 1, half-width t_{0.975,2} * 1 / sqrt(3) = 4.302653 / 1.732051 = 2.484138
    interval = mean_interval([1.0, 2.0, 3.0])
    assert interval.mean == 2.0
    assert interval.half_width == pytest.approx(2.484138, abs=1e-6)


def test_mean_interval_of_one_seed_has_no_half_width():
    interval = mean_interval([0.7])
    assert interval.mean == 0.7 and math.isnan(interval.half_width) and not interval.defined


def test_welch_interval_with_equal_spreads_has_pooled_dof():
    # a = 0.3, 0.4, 0.5 and b = 0.6, 0.7, 0.8: s^2/n = 0.01/3 each, se = sqrt(0.02/3) = 0.0816497,
    # dof = (0.02/3)^2 / (2 (0.01/3)^2 / 2) = 4, t_{0.975,4} = 2.776445 -> half-width 0.226692, diff -0.3
    interval = welch_interval([0.3, 0.4, 0.5], [0.6, 0.7, 0.8])
    assert interval.mean == pytest.approx(-0.3, abs=1e-12)
    assert interval.half_width == pytest.approx(2.776445 * math.sqrt(0.02 / 3), abs=1e-6)
    assert interval.excludes_zero()


def test_welch_interval_needs_two_values_on_each_side():
    assert not welch_interval([0.5], [0.1, 0.2]).defined


def test_t_quantile_rejects_a_probability_outside_its_range():
    with pytest.raises(ValueError, match="p=0.3"):
        t_quantile(0.3, 2)
