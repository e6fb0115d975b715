"""selftrain: constitutional self-training with an external drift monitor.

A model critiques and revises its own answers against a constitution, the revisions
fine-tune the next generation, and a monitor outside the loop compares value probes
across generations (gen-000, gen-001, ...) and raises alerts.
"""

__version__ = "0.1.0"


class UserError(Exception):
    """An error the user caused (bad config, file or path). The CLI prints it as one line."""
