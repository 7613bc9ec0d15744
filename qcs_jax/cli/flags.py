"""The flag parsing that the absl programs (qcs-train, qcs-evaluate) share.

absl's own --help lists the flags of the __main__ module, and a console
script's __main__ defines none ("Try --helpfull", exit 1): `absl_parser`
prints the program's own flags under its console-script name and exits 0.
Flag and config-override mistakes become one `error:` line and exit 2.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Callable

from absl import flags

from qcs_jax import recipes

HELP_ARGS = ("-h", "--help", "-help", "--helpshort")


def help_text(prog: str, doc: str, module: str) -> str:
  """`prog`'s usage: its docstring, then the flags its module defines."""
  lines = flags.FLAGS.module_help(module).strip().splitlines()
  body = "\n".join(lines[1:] if lines and lines[0].rstrip().endswith(":") else lines)
  return f"usage: {prog} [flags]\n\n{doc.strip()}\n\nflags:\n{body}\n"


def absl_parser(prog: str, doc: str, module: str) -> Callable[[list[str]], list[str]]:
  """An absl ``flags_parser`` for program `prog` whose flags are defined in `module`."""

  def parse(argv: list[str]) -> list[str]:
    if any(a in HELP_ARGS for a in argv[1:]):
      sys.stdout.write(help_text(prog, doc, module))
      sys.exit(0)
    return parse_flags_or_exit(packaged_configs(argv))

  return parse


def _unknown_key(err: Exception, argv: list[str]) -> str:
  """ml_collections' KeyError/AttributeError for a mistyped override -> one line naming it."""
  text = str(err).replace("\\'", "'").replace('\\"', '"')
  bad = re.search(r'instead of "([\w.]+)"', text) or re.search(r"'([\w.]+)'", text)
  hint = re.search(r'Did you mean "([\w.]+)"', text)
  name = bad.group(1) if bad else text.splitlines()[0]
  for arg in argv[1:]:
    if arg.startswith("--config."):
      path = arg[len("--config."):].split("=", 1)[0]
      if name in path.split("."):
        name = f"{path!r} (in {arg})"
        break
  return f"unknown config key {name}" + (f"; did you mean {hint.group(1)!r}?" if hint else "")


def _packaged(value: str) -> str:
  path, colon, arg = value.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  if os.path.exists(path) or os.path.dirname(path) not in ("configs", "./configs") or (
      name not in recipes.RECIPES):
    return value
  return recipes.recipe_file(name) + colon + arg


def packaged_configs(argv: list[str]) -> list[str]:
  """`--config configs/<recipe>.py[:arg]` where no such file is here (an installed
  package, run outside a checkout) -> the packaged recipe's own file, which
  configs/<recipe>.py would import: the README's commands work from any folder."""
  out = list(argv[:1])
  for i, a in enumerate(argv[1:], 1):
    if a.startswith("--config="):
      a = "--config=" + _packaged(a[len("--config="):])
    elif i > 1 and argv[i - 1] == "--config":
      a = _packaged(a)
    out.append(a)
  return out


def parse_flags_or_exit(argv: list[str]) -> list[str]:
  """An absl ``flags_parser``: flag and config-override mistakes become one ``error:`` line.

  absl would print a traceback for an unknown --config.<key> override; this
  names the key and exits with status 2 before main() runs.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    msg = str(e)
  except (AttributeError, KeyError) as e:
    msg = _unknown_key(e, argv)
  except (TypeError, ValueError, OSError, SyntaxError) as e:
    msg = f"{type(e).__name__}: {e}"
  print(f"error: {msg.splitlines()[0] if msg else 'bad command line'}", file=sys.stderr)
  sys.exit(2)
