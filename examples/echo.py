"""The classic echo server in library mode: every message comes straight back.

python examples/echo.py --port 9001
"""

import argparse

from fastws import App, Handler


class Echo(Handler):
    def on_message(self, message: str | bytes) -> None:
        self.send(message)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    args = parser.parse_args()
    app = App()
    app.mount("/", Echo)
    app.run(host=args.host, port=args.port)
