from atexport.cli import main

main()
