"""Runs the Valtronics seed's Python client class, ValtronicsWebSocketClient (extracted
from the seed page at run time, re-indented, otherwise unchanged), against fleetcast the
way the seed's ``main()`` does: connect() (which authenticates and expects an
auth_response first), subscribe() three channels, then listen(). Driven by
tests/it/seeds.rs.

The seed's own ``main()`` cannot run as written: it instantiates ``ValtronicsWebSocket``,
the JavaScript class's name, which the Python code never defines. This harness does the
same steps with ``ValtronicsWebSocketClient``, then ``ping()`` (the class's keep-alive):
the ``pong`` tells the test that the subscriptions before it are in place.

Environment: SEED_FILE, SEED_URL (ws://host:port/ws), SEED_TOKEN, SEED_TIMEOUT_MS
(default 20000). Stdout: one JSON line per event ({"ev": ...}) among the class's prints.
Stdin: EOF ends the run.
"""

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import seedtext  # noqa: E402
from seedtext import emit  # noqa: E402


async def main():
    namespace = {"__name__": "valtronics_seed"}
    try:
        Client = seedtext.load_class(os.environ["SEED_FILE"], "ValtronicsWebSocketClient", namespace)
    except seedtext.SeedError as e:
        emit("fatal", message=f"extracting ValtronicsWebSocketClient: {e}")
        return 1

    client = Client(os.environ["SEED_URL"], os.environ["SEED_TOKEN"])

    # Observe, then let the class do its own handling: every message it dispatches, and
    # each of its per-type handlers (the Python class has no callbacks to set).
    handle_message = client.handle_message

    async def observed_message(data):
        emit("message", msg=data)
        if data.get("type") == "pong":
            emit("ready")
        await handle_message(data)

    client.handle_message = observed_message
    for name in ("handle_telemetry_update", "handle_alert", "handle_device_status_update", "handle_system_status_update"):
        original = getattr(client, name)

        async def observed(data, name=name, original=original):
            emit("callback", name=name, data=data)
            await original(data)

        setattr(client, name, observed)

    # The seed's main(), step by step.
    try:
        await client.connect()
    except Exception as e:
        emit("fatal", message=f"connect() raised {type(e).__name__}: {e}")
        return 1
    emit("connected")
    await client.subscribe("telemetry", {"device_id": 1})
    await client.subscribe("alerts", {"severity": ["critical", "warning"]})
    await client.subscribe("devices")
    await client.ping()

    loop = asyncio.get_running_loop()
    stdin_closed = asyncio.Event()
    seedtext.watch_stdin(loop, stdin_closed)
    listening = asyncio.create_task(client.listen())
    closed = asyncio.create_task(stdin_closed.wait())
    timeout = int(os.environ.get("SEED_TIMEOUT_MS", "20000")) / 1000
    done, _ = await asyncio.wait({listening, closed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if listening in done:
        emit("fatal", message="listen() returned: the connection ended")
        return 1
    if closed not in done:
        emit("fatal", message=f"harness still running after {timeout} s")
        return 3
    await client.disconnect()
    await asyncio.wait({listening}, timeout=2)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
