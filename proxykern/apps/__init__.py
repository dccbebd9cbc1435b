"""Applications on top of the library: the command line, its file mode, the demo and the
benchmarks behind `proxykern bench`. Nothing in the library imports them."""
import os

#: The trained trio the repository ships (examples/trio/models: base, expert, anti-expert
#: and their tiny twins), found from a source checkout or an editable install.
SHIPPED_TRIO = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "examples", "trio", "models")
