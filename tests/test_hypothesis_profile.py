"""The hypothesis profiles of `conftest.py`: derandomised under CI, and not overridden."""

import pytest
import test_masking
import test_projection
from hypothesis import settings

import conftest


@pytest.mark.parametrize(
  ("env", "profile"),
  [
    ({}, "dev"),
    ({"CI": "true"}, "ci"),
    ({"CI": "1"}, "ci"),
    ({"CI": "false"}, "dev"),
    ({"CI": "true", "HYPOTHESIS_PROFILE": "dev"}, "dev"),
  ],
)
def test_profile_follows_ci(monkeypatch, env, profile):
  monkeypatch.delenv("CI", raising=False)
  monkeypatch.delenv("HYPOTHESIS_PROFILE", raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  assert conftest._profile() == profile


def test_ci_profile_is_derandomised():
  ci = settings.get_profile("ci")
  assert ci.derandomize and ci.database is None and ci.deadline is None


def test_module_settings_keep_the_profiles_derandomize():
  for s in (test_masking.SETTINGS, test_projection.SETTINGS):
    assert s.derandomize == settings.default.derandomize
