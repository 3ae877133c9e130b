from benchmarks.continual.cli import main

main()
