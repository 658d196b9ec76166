"""The Backhaul agent: the on-premises side of the tunnel.

It runs as a service inside the private network, keeps one outbound TLS WebSocket tunnel to the
relay (no inbound port is opened), and for each request the relay forwards it re-checks the
target against its own allow-list, opens the connection's sealed credentials with the gateway
key only it holds, calls the internal API and streams the answer back.

Modules, one job each:

=============  ================================================================================
``config``     ``AgentConfig`` from ``agent.toml`` with ``BACKHAUL_AGENT_*`` overrides
``enroll``     one-time token to member identity, keys and config directory
``policy``     the target allow-list (deny by default, re-checked for every request)
``head``       strict validation of the request head the relay sends
``auth``       applying opened credentials (Basic, API key) to the upstream request
``executor``   one upstream HTTP call per stream, bodies streamed both ways
``status``     local status endpoint (Unix socket, optional TCP) and its client
``metrics``    Prometheus metrics served by the status endpoint
``errors``     the ``AgentError`` tree
``link``       the tunnel client and handshake
``dispatch``   streams from the tunnel to the executor
``service``    the ``run`` loop: signals, reconnects, graceful shutdown
``cli``        ``backhaul-agent enroll | run | status``
=============  ================================================================================
"""
