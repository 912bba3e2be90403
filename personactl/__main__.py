from personactl.cli.app import main

main()
