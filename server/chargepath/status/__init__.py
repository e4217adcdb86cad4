"""The status page: a small read-only web page served by the gateway on ``--http-port``.

It shows what the gateway and Redis hold right now (health, policy version, store status,
degraded rate, and per tenant every limit's use against its capacity, the throttle rate and the
active suspensions), refreshed live over server-sent events. :mod:`.board` reads the figures,
:mod:`.session` signs the login sessions, :mod:`.http` serves the page, and ``page.html`` and
``login.html`` are the page itself (inline CSS and JavaScript: nothing is loaded from elsewhere).
"""
