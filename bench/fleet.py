#!/usr/bin/env python3
"""Benchmark-only fleet: many simulated hosts in one process, each the project's own `Listener` on a NATS
connection (`Bus`) and a state directory of its own, as `homelab-deploy listener` runs one; the connections share
one event-loop thread.

  fleet.py URL WORK HOST...   seeds WORK/<host>.seed, state WORK/state/<host>; logs "fleet ready" once all serve

What it leaves out of a real listener process: the state-directory lock, metrics, and one interpreter per host.
"""

import asyncio
import logging
import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's, not an installed one
import homelab_deploy as hd  # noqa: E402

if __name__ == "__main__":
    url, work, *hosts = sys.argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("nats").setLevel(logging.CRITICAL)  # as the listener command does
    stop = hd.stop_on_signals()
    buses = []
    loop = asyncio.new_event_loop()  # one for all hosts: 50 loop threads contending for one GIL cost 15% more CPU
    threading.Thread(target=loop.run_forever, name="nats-loop", daemon=True).start()
    for host in hosts:
        config = hd.ListenerConfig(
            host, "test", "git+https://git.example.com/fleet.git", state_dir=os.path.join(work, "state", host)
        )
        buses.append(
            hd.Bus(
                url,
                os.path.join(work, f"{host}.seed"),
                f"homelab-deploy-listener/{host}",
                daemon=True,
                stop=stop,
                loop=loop,
            )
        )
        listener = hd.Listener(config, buses[-1], stop=stop)
        listener.state.load_history()
        listener.start()
        hd.Registration(listener).start(stop)
    hd.log.info("fleet ready: %d hosts", len(hosts))
    hd.wait_for_stop(stop)
    for bus in buses:
        bus.close()
