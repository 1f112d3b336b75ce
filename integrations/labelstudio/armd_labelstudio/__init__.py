"""armd <-> Label Studio bridge: armd's comparison requests become pairwise Label Studio tasks, and the
annotators' answers become armd.label.v1 messages."""

__version__ = "0.1.0"
