"""The lab's homework, ``time``, as a plugin: the worked example of
README's "The homework: add an op".

Its reply is the seed's, exactly (PROTOCOL.md "Seed replies"):
``{"time": <unix seconds, float>, "time_zone": <local zone abbreviation>}``.
The seed ignored ``args``, whatever they were, and so does this.
"""

from __future__ import annotations

import time

from foxnode.plugin import op

#: (the zone's name, the whole second it was worked out for): the name can
#: change only at a second's turn (DST), and ``time`` is the op the
#: benchmarks hammer
_zone = ["", None]


@op("time", any_args=True)
def lab_time(ctx, args):
    now = ctx.now()
    second = int(now)
    if second != _zone[1]:
        # Formats the node's clock as a zone name; reads no clock of its own.
        _zone[:] = [time.strftime("%Z", time.localtime(now)), second]
    return {"time": now, "time_zone": _zone[0]}
