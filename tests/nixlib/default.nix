# A small stand-in for nixpkgs' `lib`, just big enough to evaluate
# module.nix, default.nix and flake.nix in the tests without a nixpkgs
# checkout (there is none on the test machines and no network to fetch
# one).  It is NOT a copy of nixpkgs: it implements the documented
# behaviour of the parts we use, in the simplest way that is still strict
# about the things the tests care about:
#
#   * options are declared with mkOption / mkEnableOption, nested in
#     attribute sets, possibly in several modules;
#   * definitions may be wrapped in mkIf / mkMerge / mkOverride (mkDefault,
#     mkForce); a definition of an option that does not exist is an error;
#   * every definition is checked against the option's type, and several
#     definitions are merged by the type (lists concatenate, attribute sets
#     merge per attribute, submodules are evaluated as nested modules);
#   * an option that is used but has neither a definition nor a default
#     is an error.
#
# Not supported (unused here): mkOrder/mkBefore/mkAfter, freeformType,
# disabledModules, definitions of _module.args, option declarations merged
# into submodules.
# With NIXPKGS_LIB set, the tests use the real nixpkgs lib instead of this.
let
  inherit (builtins)
    all any attrNames concatLists concatMap elem filter foldl' functionArgs
    genList head intersectAttrs isAttrs isBool isFunction isInt isList isPath
    isString length listToAttrs mapAttrs match replaceStrings substring tail
    toJSON typeOf;

  lib = rec {
    # ---------------------------------------------------------------- lists
    optional = cond: x: if cond then [ x ] else [ ];
    optionals = cond: xs: if cond then xs else [ ];
    toList = x: if isList x then x else [ x ];
    last = xs: if xs == [ ] then throw "lib.last: empty list" else builtins.elemAt xs (length xs - 1);
    flatten = x: if isList x then concatMap flatten x else [ x ];
    unique = foldl' (acc: x: if elem x acc then acc else acc ++ [ x ]) [ ];
    imap1 = f: xs: genList (i: f (i + 1) (builtins.elemAt xs i)) (length xs);
    inherit all any concatLists concatMap elem filter foldl' head length tail;

    # -------------------------------------------------------------- strings
    inherit (builtins) concatStringsSep replaceStrings toJSON;
    optionalString = cond: s: if cond then s else "";
    concatMapStrings = f: xs: builtins.concatStringsSep "" (map f xs);
    concatMapStringsSep = sep: f: xs: builtins.concatStringsSep sep (map f xs);
    hasPrefix = pre: s: substring 0 (builtins.stringLength pre) s == pre;
    hasSuffix = suf: s:
      let
        ls = builtins.stringLength s;
        lf = builtins.stringLength suf;
      in
      lf <= ls && substring (ls - lf) lf s == suf;
    splitString = sep: s:
      filter isString (builtins.split (escapeRegex sep) s);
    escapeRegex = replaceStrings
      [ "\\" "[" "]" "(" ")" "{" "}" "." "*" "+" "?" "^" "$" "|" ]
      [ "\\\\" "\\[" "\\]" "\\(" "\\)" "\\{" "\\}" "\\." "\\*" "\\+" "\\?" "\\^" "\\$" "\\|" ];
    toInt = s:
      if isString s && match "-?(0|[1-9][0-9]*)" s != null then builtins.fromJSON s
      else throw "lib.toInt: could not convert ${toJSON s} to an integer";
    isStringLike = x: isString x || isPath x || (isAttrs x && (x ? outPath || x ? __toString));

    # POSIX-shell quoting: words made of safe characters stay bare, all
    # others are wrapped in single quotes.
    escapeShellArg = arg:
      let s = toString arg; in
      if match "[[:alnum:],._+:@%/=-]+" s != null then s
      else "'${replaceStrings [ "'" ] [ "'\\''" ] s}'";
    escapeShellArgs = args: builtins.concatStringsSep " " (map escapeShellArg args);

    # ----------------------------------------------------------- attr sets
    inherit (builtins) attrNames attrValues hasAttr intersectAttrs listToAttrs mapAttrs removeAttrs;
    filterAttrs = pred: set:
      listToAttrs (concatMap (n: if pred n set.${n} then [{ name = n; value = set.${n}; }] else [ ]) (attrNames set));
    mapAttrsToList = f: set: map (n: f n set.${n}) (attrNames set);
    genAttrs = names: f: listToAttrs (map (n: { name = n; value = f n; }) names);
    recursiveUpdate = a: b:
      a // mapAttrs (n: v: if isAttrs v && isAttrs (a.${n} or null) && !(v ? _type) then recursiveUpdate a.${n} v else v) b;
    attrByPath = path: default: set:
      if path == [ ] then set
      else if isAttrs set && set ? ${head path} then attrByPath (tail path) default set.${head path}
      else default;

    # --------------------------------------------------------------- misc
    id = x: x;
    const = x: _: x;
    isDerivation = x: isAttrs x && (x.type or null) == "derivation";
    getExe = drv: "${drv}/bin/${drv.meta.mainProgram or (drv.pname or drv.name)}";
    cleanSource = src: src;
    warn = _msg: x: x;
    licenses = {
      mit = { spdxId = "MIT"; shortName = "mit"; fullName = "MIT License"; free = true; };
    };
    maintainers = { };
    platforms = {
      linux = [ "x86_64-linux" "aarch64-linux" ];
      darwin = [ "x86_64-darwin" "aarch64-darwin" ];
      unix = [ "x86_64-linux" "aarch64-linux" "x86_64-darwin" "aarch64-darwin" ];
    };

    literalExpression = text: { _type = "literalExpression"; inherit text; };
    literalMD = text: { _type = "literalMD"; inherit text; };
    mdDoc = x: x;

    # ======================================================= module system
    showOption = loc: builtins.concatStringsSep "." loc;
    showDefs = defs: builtins.concatStringsSep "" (map (d: "\n- In `${d.file}': ${showValue d.value}") defs);
    showValue = v:
      if elem (typeOf v) [ "null" "bool" "int" "float" "string" ] then toJSON v
      else if isPath v then toString v
      else "<${typeOf v}>";

    mkOption = attrs: { _type = "option"; } // attrs;
    mkEnableOption = name: mkOption {
      type = types.bool;
      default = false;
      example = true;
      description = "Whether to enable ${name}.";
    };
    mkPackageOption = pkgs: name: extra: mkOption ({
      type = types.package;
      default = pkgs.${name};
      description = "The ${name} package to use.";
    } // removeAttrs extra [ "default" "pkgsText" ]);

    mkIf = condition: content: { _type = "if"; inherit condition content; };
    mkMerge = contents: { _type = "merge"; inherit contents; };
    mkOverride = priority: content: { _type = "override"; inherit priority content; };
    mkOptionDefault = mkOverride 1500;
    mkDefault = mkOverride 1000;
    mkForce = mkOverride 50;

    isOption = x: isAttrs x && (x._type or null) == "option";
    isType = t: x: isAttrs x && (x._type or null) == t;

    # Turn one definition value into a list of { priority, value }: mkMerge
    # is flattened, false mkIf's are dropped, mkOverride sets the priority.
    dischargeProperties = priority: v:
      if isAttrs v && v ? _type then
        if v._type == "merge" then concatMap (dischargeProperties priority) v.contents
        else if v._type == "if" then
          if !isBool v.condition then throw "mkIf called with a non-Boolean condition"
          else if v.condition then dischargeProperties priority v.content
          else [ ]
        else if v._type == "override" then dischargeProperties v.priority v.content
        else [{ inherit priority; value = v; }]
      else [{ inherit priority; value = v; }];

    # Push mkIf / mkMerge / mkOverride down one level of an attribute set so
    # that the set's attribute names are known without evaluating any
    # condition (the conditions usually depend on `config`).
    pushDownProperties = v:
      if isAttrs v && v ? _type then
        if v._type == "merge" then concatMap pushDownProperties v.contents
        else if v._type == "if" then map (mapAttrs (_: mkIf v.condition)) (pushDownProperties v.content)
        else if v._type == "override" then map (mapAttrs (_: mkOverride v.priority)) (pushDownProperties v.content)
        else throw "unexpected `${v._type}' where an attribute set of options was expected"
      else if isAttrs v then [ v ]
      else throw "expected an attribute set of option definitions, got a ${typeOf v}";

    # defs: list of { file, value }.  Returns { isDefined, value }.
    mergeDefinitions = loc: type: defs:
      let
        discharged = concatMap
          (d: map (p: { inherit (d) file; inherit (p) priority value; }) (dischargeProperties 100 d.value))
          defs;
        best = foldl' (m: d: if d.priority < m then d.priority else m) 9999 discharged;
        winners = filter (d: d.priority == best) discharged;
        checked = map
          (d:
            if type.check d.value then { inherit (d) file value; }
            else throw "A definition for option `${showOption loc}' is not of type `${type.description}'. Definition values:${showDefs [ d ]}")
          winners;
      in
      {
        isDefined = winners != [ ];
        value = type.merge loc checked;
      };

    mergeEqualOption = loc: defs:
      if defs == [ ] then throw "The option `${showOption loc}' has no definitions."
      else
        (foldl'
          (first: d:
            if d.value == first.value then first
            else throw "The option `${showOption loc}' has conflicting definition values:${showDefs [ first d ]}")
          (head defs)
          (tail defs)).value;

    mergeOneOption = loc: defs:
      if length defs == 1 then (head defs).value
      else throw "The unique option `${showOption loc}' is defined multiple times:${showDefs defs}";

    mergeDefaultOption = loc: defs:
      let vals = map (d: d.value) defs; in
      if length defs == 1 then head vals
      else if all isList vals then concatLists vals
      else if all isAttrs vals then foldl' (a: b: a // b) { } vals
      else if all isString vals then builtins.concatStringsSep "" vals
      else mergeEqualOption loc defs;

    mkOptionType = { name, description ? name, check ? (_: true), merge ? mergeDefaultOption, ... }@attrs:
      attrs // { _type = "option-type"; inherit name description check merge; };

    types = rec {
      unspecified = mkOptionType { name = "unspecified"; };
      anything = mkOptionType { name = "anything"; };
      raw = mkOptionType { name = "raw"; merge = mergeOneOption; };
      bool = mkOptionType { name = "bool"; description = "boolean"; check = isBool; merge = mergeEqualOption; };
      int = mkOptionType { name = "int"; description = "signed integer"; check = isInt; merge = mergeEqualOption; };
      str = mkOptionType { name = "str"; description = "string"; check = isString; merge = mergeEqualOption; };
      nonEmptyStr = mkOptionType {
        name = "nonEmptyStr";
        description = "non-empty string";
        check = x: isString x && match "[[:space:]]*" x == null;
        merge = mergeEqualOption;
      };
      lines = mkOptionType {
        name = "lines";
        description = "strings concatenated with \"\\n\"";
        check = isString;
        merge = _loc: defs: builtins.concatStringsSep "\n" (map (d: d.value) defs);
      };
      path = mkOptionType {
        name = "path";
        description = "path";
        check = x: isPath x || (lib.isStringLike x && substring 0 1 (toString x) == "/");
        merge = mergeEqualOption;
      };
      package = mkOptionType {
        name = "package";
        description = "package";
        check = x: lib.isDerivation x || (isString x && lib.hasPrefix "/nix/store/" x);
        merge = mergeOneOption;
      };
      attrs = mkOptionType {
        name = "attrs";
        description = "attribute set";
        check = isAttrs;
        merge = _loc: defs: foldl' (a: d: a // d.value) { } defs;
      };

      ints =
        let
          between = lo: hi: description: mkOptionType {
            name = "intBetween";
            inherit description;
            check = x: isInt x && x >= lo && x <= hi;
            merge = mergeEqualOption;
          };
        in
        {
          positive = mkOptionType {
            name = "positiveInt";
            description = "positive integer, meaning >0";
            check = x: isInt x && x > 0;
            merge = mergeEqualOption;
          };
          unsigned = mkOptionType {
            name = "unsignedInt";
            description = "unsigned integer, meaning >=0";
            check = x: isInt x && x >= 0;
            merge = mergeEqualOption;
          };
          between = lo: hi: between lo hi "integer between ${toString lo} and ${toString hi} (both inclusive)";
          u16 = between 0 65535 "16 bit unsigned integer; between 0 and 65535 (both inclusive)";
        };
      port = ints.u16;

      enum = values: mkOptionType {
        name = "enum";
        description = "one of ${builtins.concatStringsSep ", " (map toJSON values)}";
        check = x: elem x values;
        merge = mergeEqualOption;
      };

      nullOr = t: mkOptionType {
        name = "nullOr";
        description = "null or ${t.description}";
        check = x: x == null || t.check x;
        merge = loc: defs:
          let nulls = filter (d: d.value == null) defs; in
          if nulls == [ ] then t.merge loc defs
          else if length nulls == length defs then null
          else throw "The option `${showOption loc}' is defined both null and not null:${showDefs defs}";
      };

      either = a: b: mkOptionType {
        name = "either";
        description = "${a.description} or ${b.description}";
        check = x: a.check x || b.check x;
        merge = loc: defs:
          if all (d: a.check d.value) defs then a.merge loc defs
          else if all (d: b.check d.value) defs then b.merge loc defs
          else mergeOneOption loc defs;
      };
      oneOf = ts:
        if ts == [ ] then throw "types.oneOf needs at least one type"
        else foldl' either (head ts) (tail ts);

      listOf = elemType: mkOptionType {
        name = "listOf";
        description = "list of ${elemType.description}";
        check = isList;
        merge = loc: defs:
          map (r: r.value)
            (filter (r: r.isDefined)
              (concatLists (lib.imap1
                (n: d: lib.imap1
                  (i: x: mergeDefinitions (loc ++ [ "[definition ${toString n}-entry ${toString i}]" ]) elemType
                    [{ inherit (d) file; value = x; }])
                  d.value)
                defs)));
      };

      attrsOf = elemType: mkOptionType {
        name = "attrsOf";
        description = "attribute set of ${elemType.description}";
        check = isAttrs;
        merge = loc: defs:
          let
            names = lib.unique (concatMap (d: attrNames d.value) defs);
            results = listToAttrs (map
              (n: {
                name = n;
                value = mergeDefinitions (loc ++ [ n ]) elemType
                  (concatMap (d: if d.value ? ${n} then [{ inherit (d) file; value = d.value.${n}; }] else [ ]) defs);
              })
              names);
          in
          mapAttrs (_: r: r.value) (lib.filterAttrs (_: r: r.isDefined) results);
      };
      lazyAttrsOf = attrsOf;

      submodule = modules: submoduleWith { modules = toList modules; };
      submoduleWith = { modules, specialArgs ? { }, ... }: mkOptionType {
        name = "submodule";
        description = "submodule";
        check = x: isAttrs x || isFunction x || isPath x;
        merge = loc: defs:
          (evalModules {
            modules = modules ++ map (d: { _file = d.file; imports = [ d.value ]; }) defs;
            specialArgs = { name = lib.last loc; } // specialArgs;
            prefix = loc;
          }).config;
      };
    };

    # ------------------------------------------------------- evalModules
    evalModules = { modules, specialArgs ? { }, prefix ? [ ] }:
      let
        moduleArgs = { inherit lib; } // specialArgs // { inherit config options; };

        knownKeys = [ "_file" "key" "imports" "options" "config" "meta" "_class" ];

        # -> { file, imports, options, config }
        loadModule = file: m:
          let
            fn = if isPath m || isString m then import m else m;
            fileName = if isPath m || isString m then toString m else file;
            v =
              if isFunction fn then
                fn (if functionArgs fn == { } then moduleArgs else intersectAttrs (functionArgs fn) moduleArgs)
              else fn;
            f = v._file or fileName;
          in
          if !isAttrs v then throw "module in ${f} is not an attribute set (got a ${typeOf v})"
          else if v ? config || v ? options then
            let unknown = filter (n: !(elem n knownKeys)) (attrNames v); in
            if unknown != [ ] then
              throw "module in ${f} has an unsupported attribute `${head unknown}' next to `config' or `options'"
            else { file = f; imports = v.imports or [ ]; options = v.options or { }; config = v.config or { }; }
          else {
            file = f;
            imports = v.imports or [ ];
            options = { };
            config = removeAttrs v knownKeys;
          };

        collect = file: m:
          let n = loadModule file m; in
          [ n ] ++ concatMap (collect n.file) n.imports;

        allModules = concatMap (collect "<unknown-file>") modules;

        # Merge the option declarations of all modules into one tree.
        mergeDecls = loc: decls:
          let opts = filter isOption decls; in
          if opts != [ ] then
            if length decls > 1 then throw "The option `${showOption loc}' is declared more than once."
            else head opts // { inherit loc; }
          else
            listToAttrs (map
              (n: {
                name = n;
                value = mergeDecls (loc ++ [ n ]) (concatMap (d: if d ? ${n} then [ d.${n} ] else [ ]) decls);
              })
              (lib.unique (concatMap attrNames decls)));

        options = mergeDecls prefix (map (m: m.options) allModules);

        evalOption = loc: opt: defs:
          let
            withDefault = defs ++ lib.optional (opt ? default) { file = "<default>"; value = mkOptionDefault opt.default; };
            res = mergeDefinitions loc opt.type withDefault;
            value =
              if res.isDefined then res.value
              else throw "The option `${showOption loc}' is used but not defined.";
          in
          if opt ? apply then opt.apply value else value;

        # defs: list of { file, value } at this level of the option tree.
        buildConfig = loc: decls: defs:
          if isOption decls then evalOption loc decls defs
          else
            let
              pushed = concatMap (d: map (v: { inherit (d) file; value = v; }) (pushDownProperties d.value)) defs;
            in
            mapAttrs
              (n: sub: buildConfig (loc ++ [ n ]) sub
                (concatMap (d: if d.value ? ${n} then [{ inherit (d) file; value = d.value.${n}; }] else [ ]) pushed))
              decls;

        # Every defined attribute must correspond to a declared option.
        checkDefined = loc: decls: d:
          all
            (v: all
              (n:
                if !(decls ? ${n}) then
                  throw "The option `${showOption (loc ++ [ n ])}' does not exist. Definition in `${d.file}'."
                else isOption decls.${n} || checkDefined (loc ++ [ n ]) decls.${n} { inherit (d) file; value = v.${n}; })
              (attrNames v))
            (pushDownProperties d.value);

        topDefs = map (m: { inherit (m) file; value = m.config; }) allModules;
        # Like nixpkgs, every (sub)module's config carries `_module`, whose
        # `args` hold functions: code that serialises a submodule's value
        # wholesale (toJSON) fails here as it would with the real lib.
        config = buildConfig prefix options topDefs // { _module = { args = moduleArgs; check = true; }; };
        checked = all (checkDefined prefix options) topDefs;
      in
      {
        inherit options;
        config = builtins.seq checked config;
      };
  };
in
lib
