from weightops.cli import main

main()
