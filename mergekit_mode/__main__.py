from mergekit_mode.cli import main

main()
