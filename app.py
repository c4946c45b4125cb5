"""Text4Seg demo: `python app.py` (Hugging Face Spaces runs this file).

Host and port follow Gradio's conventions (GRADIO_SERVER_NAME, GRADIO_SERVER_PORT);
TEXT4SEG_MODEL or --model picks the model; TEXT4SEG_SERVER or --server adds the models of an
OpenAI-compatible server (`vllm serve`) and starts on the first.
"""

import argparse
import os

from text4seg_demo.app.layout import build_demo, launch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="preset, hub id or local directory (default: best for this machine)")
    parser.add_argument("--server", action="append", metavar="URL",
                        help="an OpenAI-compatible server whose models the page offers (default: $TEXT4SEG_SERVER)")
    parser.add_argument("--share", action="store_true", help="also serve through a public Gradio link")
    parser.add_argument("--public", action="store_true",
                        help="serve strangers: only the presets and TEXT4SEG_ALLOWED_MODELS (on by itself on a Space)")
    parser.add_argument("--mcp", action=argparse.BooleanOptionalAction, default=True,
                        help="serve the segment and compare APIs as MCP tools too (default: on)")
    args = parser.parse_args()
    if args.server:
        os.environ["TEXT4SEG_SERVER"] = ",".join(args.server)
    launch(build_demo(args.model, public=args.public), mcp=args.mcp, share=args.share, show_error=True)


if __name__ == "__main__":
    main()
