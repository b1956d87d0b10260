#!/usr/bin/env python3
"""The floor homelab-deploy is measured against: bare nats-py processes that import nothing else.

floor.py responder URL SEED_FILE FIRST END     responders FIRST..END-1, a connection each, on floor.fan and
                                              floor.echo.<index>: answer every message at once, until killed
floor.py client URL SEED_FILE SUBJECT N       connect, publish one request, wait for N answers, exit
"""

import asyncio
import secrets
import sys

import nats


async def responder(url: str, seed_file: str, first: int, end: int) -> None:
    for index in range(first, end):
        nc = await nats.connect(url, nkeys_seed=seed_file, connect_timeout=20)  # a fleet starting at once is slow

        async def answer(msg, nc=nc):
            await nc.publish(msg.reply, b'{"status":"ok"}')

        for subject in ("floor.fan", f"floor.echo.{index}"):
            await nc.subscribe(subject, cb=answer)
        await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def client(url: str, seed_file: str, subject: str, expect: int) -> None:
    nc = await nats.connect(url, nkeys_seed=seed_file)
    inbox = "floor.responses." + secrets.token_hex(8)
    done, answers = asyncio.get_running_loop().create_future(), []

    async def collect(msg):
        answers.append(msg.data)
        if len(answers) == expect and not done.done():
            done.set_result(None)

    await nc.subscribe(inbox, cb=collect)
    await nc.publish(subject, b"{}", reply=inbox)
    await asyncio.wait_for(done, 30)
    await nc.close()


if __name__ == "__main__":
    mode, url, seed_file, *rest = sys.argv[1:]
    asyncio.run(
        responder(url, seed_file, int(rest[0]), int(rest[1]))
        if mode == "responder"
        else client(url, seed_file, rest[0], int(rest[1]))
    )
