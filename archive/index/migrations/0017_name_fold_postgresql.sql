-- dialect: postgresql
-- Accent-insensitive name matching (QIDO-RS fuzzymatching=true, see
-- archive/index/names.py): a folded copy of each name -- upper case, no
-- diacritics, no apostrophes, hyphens as spaces -- filled here for existing
-- rows and at ingest for new ones, by the same table as names.fold() in Python.
--
-- Indexes for name searches at 10^7 instances:
-- * prefixes (MUL*) on the folded name: text_pattern_ops, a b-tree range;
-- * contains (*côté*, *cote*): pg_trgm GIN indexes on the upper-cased and the
--   folded names.  pg_trgm ships with Debian's postgresql package (contrib)
--   and is a trusted extension (the database owner may create it); where it
--   cannot be created the migration still applies, without those two indexes
--   (a notice says so), and contains-matching reads the patients table.
CREATE FUNCTION imag_fold(name TEXT) RETURNS TEXT
LANGUAGE sql IMMUTABLE PARALLEL SAFE RETURNS NULL ON NULL INPUT
AS $$ SELECT replace(replace(translate(name,
    'ÀÁÂÃÄÅÇÈÉÊËÌÍÎÏÐÑÒÓÔÕÖØÙÚÛÜÝĀĂĄĆĈĊČĎĐĒĔĖĘĚĜĞĠĢĤĦĨĪĬĮİĴĶĹĻĽŁŃŅŇŌŎŐŔŖŘŚŜŞŠŢŤŦŨŪŬŮŰŲŴŶŸŹŻŽƉƠƯǍǏǑǓǕǗǙǛǞǠǦǨǪǬǴǸǺȀȂȄȆȈȊȌȎȐȒȔȖȘȚȞȦȨȪȬȮȰȲḀḂḄḆḈḊḌḎḐḒḔḖḘḚḜḞḠḢḤḦḨḪḬḮḰḲḴḶḸḺḼḾṀṂṄṆṈṊṌṎṐṒṔṖṘṚṜṞṠṢṤṦṨṪṬṮṰṲṴṶṸṺṼṾẀẂẄẆẈẊẌẎẐẒẔẠẢẤẦẨẪẬẮẰẲẴẶẸẺẼẾỀỂỄỆỈỊỌỎỐỒỔỖỘỚỜỞỠỢỤỦỨỪỬỮỰỲỴỶỸ-''’',
    'AAAAAACEEEEIIIIDNOOOOOOUUUUYAAACCCCDDEEEEEGGGGHHIIIIIJKLLLLNNNOOORRRSSSSTTTUUUUUUWYYZZZDOUAIOUUUUUAAGKOOGNAAAEEIIOORRUUSTHAEOOOOYABBBCDDDDDEEEEEFGHHHHHIIKKKLLLLMMMNNNNOOOOPPRRRRSSSSSTTTTUUUUUVVWWWWWXXYZZZAAAAAAAAAAAAEEEEEEEEIIOOOOOOOOOOOOUUUUUUUYYYY '),
    'Œ', 'OE'), 'Æ', 'AE') $$;
ALTER TABLE patients ADD COLUMN patient_name_fold TEXT;
ALTER TABLE studies ADD COLUMN referring_physician_name_fold TEXT;
UPDATE patients SET patient_name_fold = imag_fold(patient_name_norm)
    WHERE patient_name_norm IS NOT NULL;
UPDATE studies SET referring_physician_name_fold = imag_fold(referring_physician_name_norm)
    WHERE referring_physician_name_norm IS NOT NULL;
CREATE INDEX patients_by_name_fold ON patients (patient_name_fold text_pattern_ops);
DO $$
BEGIN
    CREATE EXTENSION IF NOT EXISTS pg_trgm;
    CREATE INDEX patients_by_name_trgm ON patients USING gin (patient_name_norm gin_trgm_ops);
    CREATE INDEX patients_by_name_fold_trgm ON patients USING gin (patient_name_fold gin_trgm_ops);
EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE USING MESSAGE = 'pg_trgm unavailable (' || SQLERRM
        || '): name contains-matching will not use an index';
END $$;
