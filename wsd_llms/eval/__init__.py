"""`wsd-llms eval`: run a prompt set through base-only, draft-only and WSD (optionally over a sweep of
thresholds and windows) and report switch points, token shares, speed and reply-quality signals.

Modules: `prompts` (the prompt set and its loader), `signals` (quality signals), `runner` (settings and
per-reply records), `summary` (per-setting numbers), `svg` (plots), `report` (HTML/JSON/Markdown),
`judge` (optional pairwise judge), `evaluate` (one run end to end), `command` (the CLI front).
"""

from .evaluate import evaluate
from .prompts import EvalPrompt, Problem, load_prompts
from .runner import Setting, settings_for

__all__ = ["EvalPrompt", "Problem", "Setting", "evaluate", "load_prompts", "settings_for"]
