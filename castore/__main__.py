from castore.cli import main

main()
