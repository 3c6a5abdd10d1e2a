"""The router's MongoDB wire-protocol front end: applications keep their MongoDB driver.

``wire`` frames and parses messages (OP_MSG, and the legacy OP_QUERY handshake), ``server``
runs connections, ``registry`` dispatches commands to the modules that implement them
(``admin``, ``auth``, ``reads``, ``writes``, ``indexes``), all over the same ``Router`` core as
the HTTP API (routing, fences, cutover absorption).
"""
