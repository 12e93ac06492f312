"""Check that the main job printed the table the README documents.

    python .ci/check_readme_table.py README.md RUN_LOG

The README's quick start shows the expected table in the first fenced block that holds a ``| benchmark |`` header;
every row of it must appear, character for character, in the run's output (the run prints more rows: pass@1, maj@1).
"""
import sys
from pathlib import Path


def main(readme: str, log: str) -> int:
    blocks, block = [], None
    for line in Path(readme).read_text().splitlines():
        if line.startswith("```"):
            if block is None:
                block = []
            else:
                blocks.append("\n".join(block))
                block = None
        elif block is not None:
            block.append(line)
    table = next((b for b in blocks if "| benchmark |" in b), None)
    if table is None:
        print(f"{readme} has no fenced block with a '| benchmark |' table")
        return 1
    printed = {line.strip() for line in Path(log).read_text().splitlines()}
    missing = [row for row in table.strip().splitlines() if row.strip() not in printed]
    if missing:
        print("the main job did not print the README's table; missing rows:\n  " + "\n  ".join(missing))
        return 1
    print(f"the main job printed the README's table ({len(table.strip().splitlines())} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
