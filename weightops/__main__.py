from weightops.console import main

main()
