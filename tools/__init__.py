"""Developer tools, not part of the installed package: the seeded synthetic-scene generator
(benchmarks, scale tests) and the builder of the embedded sample catalog (catalogs/sample)."""
