"""Entry points restart once with glibc settings that keep XLA's per-step temporaries mapped."""
import sys

from humpback_jax import malloc_env


def test_restart_adds_the_settings_and_re_runs_the_same_command():
  calls, environ = [], {}
  malloc_env.restart_with_settings(environ, execv=lambda exe, argv: calls.append((exe, argv)))
  assert environ == malloc_env.SETTINGS
  assert calls == [(sys.executable, [sys.executable, *sys.orig_argv[1:]])]


def test_no_restart_once_the_settings_are_there_and_a_users_value_wins():
  calls = []
  environ = {**malloc_env.SETTINGS, "MALLOC_ARENA_MAX": "4"}
  malloc_env.restart_with_settings(environ, execv=lambda *a: calls.append(a))
  assert calls == [] and environ["MALLOC_ARENA_MAX"] == "4"
  assert malloc_env.missing({"MALLOC_ARENA_MAX": "4"}) == {k: v for k, v in malloc_env.SETTINGS.items()
                                                           if k != "MALLOC_ARENA_MAX"}


def test_opting_out_skips_the_restart():
  calls, environ = [], {malloc_env.OPT_OUT: "0"}
  malloc_env.restart_with_settings(environ, execv=lambda *a: calls.append(a))
  assert calls == [] and environ == {malloc_env.OPT_OUT: "0"}
