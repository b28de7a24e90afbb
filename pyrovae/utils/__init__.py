"""Small pieces every layer uses: random-number state (:mod:`rng`), progress bars (:mod:`progress`) and files
written atomically (:mod:`files`). Imports nothing else of pyrovae."""

