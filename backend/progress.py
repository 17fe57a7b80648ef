"""The one progress type: what every long computation takes to say how far it is.

`progress(fraction, stage)`: fraction in [0, 1] of the computation's own work, never going back;
stage, what it is doing ("Layer 3/30"). A job gives each computation a span of its own fraction
(`JobContext.span`), which also raises JobCancelled once the job is cancelled.
"""

from collections.abc import Callable

Progress = Callable[[float, str], None]
