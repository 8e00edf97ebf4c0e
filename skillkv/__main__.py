from skillkv.cli import main

main()
